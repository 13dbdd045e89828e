"""The six stages of a Defuse run, in order, one module each:

1. `train`: the classifier to debug and the VAE (a user's own models are recorded instead);
2. `search`: misclassified inputs found in the VAE's latent space;
3. `distill`: those errors grouped into misclassification regions by a mixture model;
4. `label`: one label per region (the source label, an oracle classifier, or a person);
5. `correct`: the classifier fine-tuned on samples of the labeled regions;
6. `evaluate`: region and test accuracy before and after, the report.

Each `stage_<name>(ctx)` takes the run's `stage_context.Context` and returns the JSON-able
summary the run directory keeps in `<stage>/stage.json`; `pipeline.run` runs them in order and
skips the ones that are done. The stages never import the orchestrator (`tests/test_layering.py`).
"""
