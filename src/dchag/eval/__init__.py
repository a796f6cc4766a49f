"""Evaluation of trained runs (`dchag eval`): the model against its field's baselines."""
