"""Storage and what is kept in it: object I/O (local, S3), the nightly lease, result tables and their views."""
