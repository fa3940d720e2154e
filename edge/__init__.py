"""Edge runtime for a Chinese fill-in-the-blank (BERT masked-LM) service.

Runs on the board: depends only on onnxruntime, tokenizers, numpy, flask, waitress
and pyserial. Never imports torch or transformers (``tools/`` does that).
"""

__version__ = "0.1.0"
