"""vitslim."""
