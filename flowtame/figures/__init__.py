"""Pictures: NLL histograms and sample grids."""
