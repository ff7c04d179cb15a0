"""What the user runs: first-boot enrollment, renewal and status (enroll|renew|run|status)."""
