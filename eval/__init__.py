"""Evaluation, paper reproduction and benchmarks.

Installed as ``multispin_eval`` (folder ``eval/``).
"""
