"""Hydra configs of commlab; a package so that an installed commlab finds them."""
