"""Sequential block-by-block calibration."""
