"""seg_finetune: train cross-attention + segmentation head on the frozen, pretrained towers."""

from jurassiglip.model import checkpoint
from jurassiglip.runtime.codedeps import fingerprint
from jurassiglip.config import Params
from jurassiglip.data.manifest import Manifest
from jurassiglip.data.tokenizer import tokenize
from jurassiglip.runtime.env import device, seed_everything
from jurassiglip.training.seg_finetune import check_splits, segmentation_objective
from jurassiglip.model.build import model_from_payload, with_decoder
from jurassiglip.runtime.entry import entry
from jurassiglip.runtime.paths import FEATURES_DIR, FINETUNE_CHECKPOINTS, MANIFEST_DIR, PRETRAIN_CHECKPOINTS
from jurassiglip.runtime.tracking import StageTracker
from jurassiglip.training.loop import fit, loop_settings

NAME = "seg_finetune"


def run(params: Params, tracker: StageTracker) -> None:
    seed_everything(params.seed)
    pretrained = PRETRAIN_CHECKPOINTS / checkpoint.BEST
    payload = checkpoint.load(pretrained)
    manifest = Manifest.load(MANIFEST_DIR, payload["spec"].arch.image_size, f"the image_size of {pretrained}")
    check_splits(manifest, params.finetune, params.data.train_split, params.data.val_split)
    model, tokenizer, spec = model_from_payload(pretrained, payload)
    model = model.to(device())
    spec = with_decoder(model, spec, params.model.decoder)  # stage 1 trained no head: model.decoder's starts here
    input_ids, attention_mask = tokenize(tokenizer, manifest.samples["sentence"].tolist(), spec.arch.text_max_len)
    upstream = [pretrained, MANIFEST_DIR / "samples.parquet"]
    splits = (params.data.train_split, params.data.val_split)
    objective = segmentation_objective(
        model, manifest, input_ids, attention_mask, cfg=params.finetune, train_split=splits[0],
        val_split=splits[1], seed=params.seed, features_dir=FEATURES_DIR,
        cache_fingerprint=fingerprint(NAME, "features", splits, files=upstream),
        spec=spec, tokenizer=tokenizer)
    result = fit(
        objective, loop_settings(params.finetune), FINETUNE_CHECKPOINTS,
        run_fingerprint=fingerprint(NAME, params.model.decoder, params.finetune, params.seed, splits, files=upstream),
        tracker=tracker)
    tracker.log_metrics(result.metrics())


main = entry(NAME, run)

if __name__ == "__main__":
    main()
