"""Data: the text corpus (registry packages and local files), tokenizers and token files."""

from .corpus import (SOURCES, Document, default_data_dir, iter_source_documents, load_documents,
                     split_documents)
from .tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer, tokenizer_fingerprint
from .tokens import EvalWindows, StreamBatches, TokenBatches, TokenFile, prepare

__all__ = ["SOURCES", "Document", "default_data_dir", "iter_source_documents", "load_documents",
           "split_documents", "Tokenizer", "ByteTokenizer", "BPETokenizer", "load_tokenizer", "tokenizer_fingerprint",
           "prepare", "TokenFile", "TokenBatches", "StreamBatches", "EvalWindows"]
