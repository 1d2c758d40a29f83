"""Datasets as tensors ready for the device, and the readers of the files behind them."""
