"""Raw text generators of the original's query datasets: `(mode, seed) -> iterator of texts`."""
