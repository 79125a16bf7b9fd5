"""Component: displacement statistics of the stage-1 model and the GMM behind the Mixed Gaussian Masks.

Only CAL uses the GMM; for other methods the task writes a ``gmm.json``
saying it was skipped (the DAG is the same for every method because
kfp.local 2.16.1 cannot run ``dsl.If`` branches correctly: see
docs/parameters.md).
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.images import image


@dsl.component(base_image=image("gmm"), install_kfp_package=False)
def fit_gmm(checkpoint: Input[Model], shards: Input[Dataset], input_size: str, method: str,
            components: str, max_components: int, experiment: str, parent_run_id: str,
            gmm: Output[Artifact]) -> None:
    """Fit the displacement GMM (``components``: ``auto`` = by BIC, ``paper`` or a number); writes ``<gmm>/gmm.json``."""
    import json
    from pathlib import Path

    from components.runtime import run_stage

    if method != "cal":
        Path(gmm.path).mkdir(parents=True, exist_ok=True)
        note = {"skipped": True, "reason": f"Mixed Gaussian Masks are CAL-only; method is {method}"}
        (Path(gmm.path) / "gmm.json").write_text(json.dumps(note, indent=2))
        gmm.metadata.update(note)
        return
    run_stage(["fit-gmm", "--checkpoint", f"{checkpoint.path}/model.pt", "--shards", f"{shards.path}/{input_size}",
               "--out", gmm.path, "--components", components, "--max-components", str(max_components)],
              experiment, parent_run_id)
