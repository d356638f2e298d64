"""A Hugging Face cache holding the exercises' default Hub ids, built small from the shared assets, for tests.

`build(hf_home, shared)` fills `<hf_home>/hub` with the layout huggingface_hub's own downloads leave (read in
huggingface_hub 2.4: file_download.py's repo_folder_name, _create_symlink and
_cache_commit_hash_for_specific_revision, and the tree cache of _tree_cache.py that snapshot_download writes):

    <repo_type>s--<org>--<name>/
        blobs/<sha256 of an LFS file, or the git blob sha1 of any other>
        snapshots/<40-hex commit>/<path in the repo>  ->  ../../blobs/<blob>   (relative symlinks)
        refs/main                                                             (the commit, no newline)
        trees/<commit>.json                                                   (the commit's file listing)

so that with HF_HOME=<hf_home> and HF_HUB_OFFLINE=1 the libraries' own offline code finds every repo:
`snapshot_download(id, repo_type=..., local_files_only=True)` (what hub.resolve_pretrained calls) returns
the snapshot, and `datasets.load_dataset(<snapshot>)` reads its README and data files. The tree listing
makes snapshot_download check the snapshot is complete, as it does for a real download.

Weights are random and tiny; everything else follows the Hub repos, each as its comment says. Commits are
content hashes of the listing, not the Hub's commits: these snapshots are not the Hub's files.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from conftest import build_tiny_distilbert

MODEL_IDS = ("distilbert-base-uncased", "openai/clip-vit-base-patch16")
DATASET_IDS = ("cornell-movie-review-data/rotten_tomatoes", "zh-plus/tiny-imagenet")
# what these repos' .gitattributes send to LFS: such blobs are named by their sha256 (the Hub's X-Linked-Etag)
LFS_SUFFIXES = (".safetensors", ".bin", ".parquet")
TRAIN_PER_CLASS, VALID_PER_CLASS = 4, 2    # Tiny ImageNet images kept per class: all 200 classes, seconds to build


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def add_repo(hf_home: Path, repo_id: str, repo_type: str, files: dict[str, bytes]) -> Path:
    """Write `files` ({path in the repo: content}) as one commit of `repo_id` on `main`; return the snapshot."""
    storage = Path(hf_home) / "hub" / "--".join([f"{repo_type}s", *repo_id.split("/")])
    entries, blobs = {}, {}
    for name, content in sorted(files.items()):
        if name.endswith(LFS_SUFFIXES):
            sha256 = hashlib.sha256(content).hexdigest()
            # the Hub lists an LFS file with the git id of its pointer file and the content's sha256
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(content)}\n"
            entries[name] = {"size": len(content), "blob_id": git_blob_sha1(pointer.encode()),
                             "lfs_sha256": sha256, "lfs_size": len(content)}
            blobs[name] = sha256
        else:
            entries[name] = {"size": len(content), "blob_id": git_blob_sha1(content)}
            blobs[name] = entries[name]["blob_id"]
    commit = hashlib.sha1(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    snapshot = storage / "snapshots" / commit
    for name, content in files.items():
        blob = storage / "blobs" / blobs[name]
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    (storage / "trees").mkdir(exist_ok=True)
    (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": entries}, indent=1))
    return snapshot


def read_files(folder: Path, names) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in names}


def distilbert_files(work: Path, corpus: list[str]) -> dict[str, bytes]:
    """distilbert-base-uncased (distilbert/distilbert-base-uncased on the Hub, which redirects the old id): the
    files of its main branch that transformers loads. config.json is DistilBertForMaskedLM's with tiny sizes;
    tokenizer_config.json is the Hub's own (48 bytes since its commit 12040ac, 'Updates incorrect tokenizer
    configuration file (#12)'), so the tokenizer class comes from config.json as it does for users."""
    folder = build_tiny_distilbert(work / "distilbert", corpus, masked_lm=True)
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    return {**read_files(folder, ("config.json", "model.safetensors", "tokenizer.json")),
            "tokenizer_config.json": json.dumps({"do_lower_case": True, "model_max_length": 512}).encode(),
            "vocab.txt": "".join(f"{token}\n" for token in sorted(vocab, key=vocab.get)).encode()}


# openai/clip-vit-base-patch16's preprocessor_config.json, key for key (316 bytes on the Hub, the same in every
# OpenAI CLIP repo): the legacy CLIPFeatureExtractor form, integer size and crop_size, resample 3 = bicubic
CLIP_PREPROCESSOR = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                     "feature_extractor_type": "CLIPFeatureExtractor",
                     "image_mean": [0.48145466, 0.4578275, 0.40821073],
                     "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}


def clip_files(work: Path, tokenizer_dir: Path) -> dict[str, bytes]:
    """openai/clip-vit-base-patch16: a tiny random CLIP (2 layers, 224 px images in 32 px patches: 49 per image)
    with the real BPE files (vocab.json, merges.txt) and the Hub's preprocessor_config.json. The weights are a
    pytorch_model.bin: the OpenAI CLIP repos' main branches hold PyTorch, TensorFlow and JAX weights, their
    safetensors only in a pull request (refs/pr/1). The processor_config.json transformers 5 saves is left
    out: the Hub repo has none, and the image processor must come from its preprocessor_config.json."""
    import torch
    from safetensors.torch import load_file

    from tools.build_tiny_clip import build_tiny_clip

    folder = build_tiny_clip(work / "clip", tokenizer_dir=str(tokenizer_dir), image_size=224, patch_size=32)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    return {**read_files(folder, ("config.json", "pytorch_model.bin", "tokenizer.json", "tokenizer_config.json")),
            **read_files(tokenizer_dir, ("vocab.json", "merges.txt")),
            "preprocessor_config.json": json.dumps(CLIP_PREPROCESSOR, indent=2).encode()}


def parquet_file(columns: dict, features) -> tuple[bytes, int]:
    """(a table as datasets' own to_parquet writes it, with the `huggingface` schema metadata holding the
    features; its size in Arrow, the num_bytes of a dataset_info split)."""
    from datasets import Dataset

    table = Dataset.from_dict(columns, features=features)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "table.parquet"
        table.to_parquet(str(path))
        return path.read_bytes(), table.data.nbytes


def yaml_card(dataset_info: str, title: str) -> bytes:
    return f"---\ndataset_info:\n{dataset_info}---\n\n# {title}\n\nBuilt for tests by tests/hub_cache.py.\n".encode()


def class_label_yaml(names: list[str], indent: str) -> str:
    lines = "".join(f"{indent}      '{i}': {name}\n" for i, name in enumerate(names))
    return f"{indent}dtype:\n{indent}  class_label:\n{indent}    names:\n{lines}"


def rotten_tomatoes_files(rt_dir: Path) -> dict[str, bytes]:
    """cornell-movie-review-data/rotten_tomatoes since its commit aa13bc2 ('Remove dataset script (#6)'):
    train.parquet, validation.parquet and test.parquet at the top, and a README whose YAML has the
    dataset_info below (its split sizes, which datasets checks, are the Hub's: 8530/1066/1066) and no
    configs block, so datasets finds the splits by file name. The rows come from the original files through
    the project's own split recipe, data.load_rt_polarity."""
    import data
    from datasets import ClassLabel, Features, Value

    loaded = data.load_rt_polarity(rt_dir)
    features = Features({"text": Value("string"), "label": ClassLabel(names=loaded["label_names"])})
    info = ("  features:\n  - name: text\n    dtype: string\n  - name: label\n"
            + class_label_yaml(loaded["label_names"], "    ")
            + "  splits:\n  - name: train\n    num_bytes: 1074810\n    num_examples: 8530\n"
            "  - name: validation\n    num_bytes: 134679\n    num_examples: 1066\n"
            "  - name: test\n    num_bytes: 135972\n    num_examples: 1066\n"
            "  download_size: 487770\n  dataset_size: 1345461\n")
    return {"README.md": yaml_card(info, 'Dataset Card for "rotten_tomatoes"'),
            **{f"{split}.parquet": parquet_file(columns, features)[0] for split, columns in loaded["splits"].items()}}


def tiny_imagenet_rows(folder: Path, wnids: list[str]) -> dict[str, list]:
    """Rows of a subset of the release: the first images of every class in train/, and of val/ (labelled
    by val_annotations.txt), grouped by class in label order, each as its JPEG bytes and file name."""
    index = {wnid: i for i, wnid in enumerate(wnids)}
    by_class = {"train": {wnid: sorted((folder / "train" / wnid / "images").iterdir())[:TRAIN_PER_CLASS]
                          for wnid in wnids},
                "valid": {wnid: [] for wnid in wnids}}
    for line in (folder / "val" / "val_annotations.txt").read_text().splitlines():
        filename, wnid = line.split("\t")[:2]
        if len(by_class["valid"][wnid]) < VALID_PER_CLASS:
            by_class["valid"][wnid].append(folder / "val" / "images" / filename)
    rows = {}
    for split, files in by_class.items():
        ordered = [(index[wnid], path) for wnid in wnids for path in files[wnid]]
        rows[split] = {"image": [{"bytes": path.read_bytes(), "path": path.name} for _, path in ordered],
                       "label": [label for label, _ in ordered]}
    return rows


def tiny_imagenet_files(folder: Path) -> dict[str, bytes]:
    """zh-plus/tiny-imagenet: data/train-00000-of-00001-<hash>.parquet and data/valid-...parquet (the names in
    its tree at commit b427d14), which datasets reads as splits `train` and `valid`; columns `image` (an Image:
    the JPEG bytes and the file's base name, what push_to_hub embeds) and `label`, a ClassLabel of the 200
    WordNet ids in sorted order, the imagefolder order its dataset_infos.json (commit 7d7dcc5) and its viewer
    show (label 0 = n01443537), not wnids.txt's. Rows are grouped by class, as the viewer shows train.
    Its README's YAML could not be read here; the dataset_info below is what push_to_hub writes, with this
    subset's split sizes (TRAIN_PER_CLASS and VALID_PER_CLASS images per class)."""
    from datasets import ClassLabel, Features, Image

    wnids = sorted(folder.joinpath("wnids.txt").read_text().split())
    features = Features({"image": Image(), "label": ClassLabel(names=wnids)})
    rows = tiny_imagenet_rows(folder, wnids)
    tables = {split: parquet_file(columns, features) for split, columns in rows.items()}
    info = ("  features:\n  - name: image\n    dtype: image\n  - name: label\n" + class_label_yaml(wnids, "    ")
            + "  splits:\n" + "".join(f"  - name: {split}\n    num_bytes: {size}\n    num_examples: "
                                      f"{len(rows[split]['label'])}\n" for split, (_, size) in tables.items()))
    return {"README.md": yaml_card(info, "Dataset Card for tiny-imagenet"),
            "data/train-00000-of-00001-1359597a978bc4fa.parquet": tables["train"][0],
            "data/valid-00000-of-00001-70d52db3c749a935.parquet": tables["valid"][0]}


def build(hf_home: Path, shared: Path) -> dict[str, Path]:
    """Fill `hf_home` (a folder used as HF_HOME) with the four repos, from the shared assets folder
    `shared`; return {repo id: its snapshot folder}."""
    import data

    rt_dir = shared / "data" / "rotten_tomatoes"
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        corpus = data.load_rt_polarity(rt_dir)["splits"]["train"]["text"]
        contents = {("distilbert-base-uncased", "model"): distilbert_files(work, corpus),
                    ("openai/clip-vit-base-patch16", "model"): clip_files(work, shared / "models" / "clip-tokenizer"),
                    ("cornell-movie-review-data/rotten_tomatoes", "dataset"): rotten_tomatoes_files(rt_dir),
                    ("zh-plus/tiny-imagenet", "dataset"): tiny_imagenet_files(shared / "data" / "tiny-imagenet-200")}
    return {repo_id: add_repo(hf_home, repo_id, repo_type, files) for (repo_id, repo_type), files in contents.items()}


def only_repos(hf_home: Path, source_home: Path, folders: list[str]) -> Path:
    """A second HF_HOME that holds some of `source_home`'s repo folders (e.g. a dataset but not its model)."""
    (hf_home / "hub").mkdir(parents=True, exist_ok=True)
    for name in folders:
        shutil.copytree(source_home / "hub" / name, hf_home / "hub" / name, symlinks=True)
    return hf_home
