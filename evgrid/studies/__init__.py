"""Reproductions of the papers in ``SEEDS.md``: one module per study (``seed001``, ``seed003``, ...), each with
``run(ctx) -> StudyOutput``; :func:`evgrid.studies.common.reproduce` (``evgrid reproduce STUDY``) runs one and
writes ``results.parquet``, ``report.md`` and its figures to a run directory."""

from __future__ import annotations

from evgrid.studies.common import STUDIES, Claim, Context, StudyOutput, reproduce, row, write_outputs

__all__ = ["STUDIES", "Claim", "Context", "StudyOutput", "reproduce", "row", "write_outputs"]
