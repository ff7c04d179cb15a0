"""The device fixtures of tests/workflow (a personalized virtual SIM, a config for an in-process
EST test server, the CLI in process), shared with the public API's tests."""

from tests.workflow.conftest import device, sim_template  # noqa: F401
