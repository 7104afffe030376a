"""The five DVC stages, one thin module each: read params, call jurassiglip, log."""
