"""Text from originals: what the chunker's process pool runs.

``content_types`` decides at upload time what a file is (the web role imports it alone);
``extract`` gets text per page out of an original; ``chunking`` splits pages into chunks.
Everything here is plain functions and frozen dataclasses, so it crosses the process
boundary by pickling.
"""
