"""Pure pixel code: DICOM bytes -> header and HU (``read``), HU -> windows (``windowing``), both -> the
model's uint8 input (``preprocess``). No I/O: callers hand in bytes."""
