"""gpumesh benchmarks: each module here measures one part against a baseline in the same run."""
