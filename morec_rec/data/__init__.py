"""The on-disk dataset format, its sources, preparation and the synthetic generator."""
