"""Serverless functions: deploy a handler once, answer every HTTP request in a fresh micro-VM (docs/functions.md)."""
