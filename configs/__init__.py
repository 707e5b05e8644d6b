"""Typed configuration (dataclasses) and the YAML files of the service."""
