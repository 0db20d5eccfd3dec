"""Datasets: ``dataset[i] -> (transform(events), label)`` over recordings on disk or made here."""
