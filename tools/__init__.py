"""Tools the model calls: files, search, shell jobs, git; workspace sandbox and permissions."""
