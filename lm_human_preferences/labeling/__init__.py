"""Human-preference labels: their types and files, mock labelers, and collecting labels on samples."""
