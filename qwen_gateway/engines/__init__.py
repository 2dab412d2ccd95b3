"""Engines: one interface (``base.Engine``) and one package per implementation."""
