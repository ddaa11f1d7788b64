"""The RocksDB-backed document-status table and its state machine."""
