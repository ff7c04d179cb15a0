"""The card layer: APDUs, status words, TLVs, logical channels, IoT SAFE and UICC commands."""
