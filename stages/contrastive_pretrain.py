"""contrastive_pretrain: align image CLS and caption features (LoRA + text projection + logit scale)."""

import dataclasses

from jurassiglip.runtime.codedeps import fingerprint
from jurassiglip.config import Params
from jurassiglip.data.manifest import Manifest
from jurassiglip.data.tokenizer import caption_tokenizer, tokenize
from jurassiglip.runtime.env import device, seed_everything
from jurassiglip.model.build import build_model, hub_offline_unless_pretrained
from jurassiglip.model.spec import PROTOTYPE, ModelSpec
from jurassiglip.training.contrastive_pretrain import check_splits, contrastive_objective
from jurassiglip.runtime.entry import entry
from jurassiglip.runtime.paths import MANIFEST_DIR, PRETRAIN_CHECKPOINTS, TOKENIZER_DIR
from jurassiglip.runtime.tracking import StageTracker
from jurassiglip.training.loop import fit, loop_settings

NAME = "contrastive_pretrain"


def run(params: Params, tracker: StageTracker) -> None:
    hub_offline_unless_pretrained(params.model.preset)
    seed_everything(params.seed)
    manifest = Manifest.load(MANIFEST_DIR, params.model.arch.image_size, f"model.{params.model.preset}.image_size")
    check_splits(manifest, params.pretrain, params.data.train_split, params.data.val_split)
    tokenizer = caption_tokenizer(params.model, TOKENIZER_DIR)
    input_ids, attention_mask = tokenize(tokenizer, manifest.samples["sentence"].tolist(),
                                         params.model.arch.text_max_len)
    # no head trains here: the model carries the prototype's, and stage 2 puts model.decoder's in its place
    spec = dataclasses.replace(ModelSpec.from_params(params, tokenizer), decoder=PROTOTYPE)
    model = build_model(spec).to(device())
    objective = contrastive_objective(
        model, manifest, input_ids, attention_mask, cfg=params.pretrain, train_split=params.data.train_split,
        val_split=params.data.val_split, seed=params.seed, spec=spec, tokenizer=tokenizer)
    result = fit(
        objective, loop_settings(params.pretrain), PRETRAIN_CHECKPOINTS,
        run_fingerprint=fingerprint(NAME, spec.to_dict(), params.pretrain, params.seed, params.data.train_split,
                                    params.data.val_split, files=[MANIFEST_DIR / "samples.parquet"]),
        tracker=tracker)
    tracker.log_metrics(result.metrics())


main = entry(NAME, run)

if __name__ == "__main__":
    main()
