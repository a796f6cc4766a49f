"""Using a trained model: `dchag.load` (a run or export folder as one object), forecast rollouts,
embeddings and probes. Each module imports torch and the data stack only when used."""
