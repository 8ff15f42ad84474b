"""GGUF files: read tensors and metadata, write tensors llama.cpp loads.

``iq3_s`` (GGML type 21) and ``iq4_nl`` (20) tensors are read and written as
:class:`itq3s_jax.QuantizedTensor` with their bytes unchanged; ``itq3_s`` uses
type 41 (see ``type41`` of :func:`read_quantized` / ``allow_type41`` of
:func:`write_gguf`); tensors of any other GGML type travel as :class:`RawTensor`
bytes or are read as float32 arrays. Byte layouts: docs/FORMAT.md.

>>> from itq3s_jax import gguf
>>> sorted(gguf.__all__)[:2]
['RawTensor', 'TensorFile']
>>> # gguf.write_gguf("out.gguf", {"w": itq3s_jax.quantize(w, "iq3_s")}, {"general.name": "x"})
>>> # md = gguf.read_metadata("out.gguf"); qts = gguf.read_quantized("out.gguf")
"""

from itq3s_jax._src.gguf_io import RawTensor
from itq3s_jax._src.gguf_io import TensorFile
from itq3s_jax._src.gguf_io import read_metadata
from itq3s_jax._src.gguf_io import read_quantized
from itq3s_jax._src.gguf_io import read_tensors
from itq3s_jax._src.gguf_io import write_gguf

__all__ = [
    "RawTensor",
    "TensorFile",
    "read_metadata",
    "read_quantized",
    "read_tensors",
    "write_gguf",
]
