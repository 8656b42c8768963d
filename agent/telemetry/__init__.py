"""In-memory recorders and system samples; SQLite and upload come later."""
