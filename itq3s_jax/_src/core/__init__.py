"""The format core: block plans, bit packing, the FWHT, the format registry and QuantizedTensor."""
