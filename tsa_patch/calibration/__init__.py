"""Calibration data and measurements (installed as ``tsa_patch.calibration``)."""
