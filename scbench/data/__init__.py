"""Data: official rows (hub or local files), offline generated rows, and validation of the schema."""
from scbench.data.loaders import DataError, generate_rows, load_examples, parse_row, write_jsonl

__all__ = ["DataError", "generate_rows", "load_examples", "parse_row", "write_jsonl"]
