"""Evaluation per task: ``segment`` (vessel maps against manual annotations); enhance, score and grade follow."""
