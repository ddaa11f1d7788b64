"""Faust web views of the web role."""
