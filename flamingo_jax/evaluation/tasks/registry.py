"""The evaluation tasks by name, each with its fixed protocol (evaluation.md) and the
folder of --data-dir it reads (DATA/coco/, DATA/vqav2/, ... ; `coco_tfds` reads the TFDS
data dir DATA/tfds/, which may be a link to ~/tensorflow_datasets).

Adding a task: `register(Task(...))` from its module, or one more entry below.
"""
import functools
import os

from flamingo_jax.evaluation.tasks import captioning, classification, vqa
from flamingo_jax.evaluation.tasks.base import Task, TaskData

TASKS: dict[str, Task] = {}


def register(*tasks: Task) -> None:
  for task in tasks:
    if task.name in TASKS:
      raise ValueError(f"task {task.name!r} is registered twice")
    TASKS[task.name] = task


def get(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
  return TASKS[name]


def _read_folder(folder: str, reader, data_dir: str) -> TaskData:
  return reader(os.path.join(data_dir, folder))


def _image_task(name, family, metric, max_new_tokens, folder, reader, layout, **kw) -> Task:
  """A Task whose load(data_dir) reads data_dir/folder with `reader`."""
  return Task(name=name, family=family, metric=metric, max_new_tokens=max_new_tokens,
              load=functools.partial(_read_folder, folder, reader),
              layout=f"{folder}/ holding {layout}", **kw)


register(
    _image_task("coco", "captioning", "cider", 20, "coco", captioning.load_coco,
                captioning.COCO_LAYOUT, postprocess="caption"),
    _image_task("coco_tfds", "captioning", "cider", 20, "tfds", captioning.load_coco_tfds,
                captioning.COCO_TFDS_LAYOUT, postprocess="caption"),
    _image_task("flickr30k", "captioning", "cider", 20, "flickr30k", captioning.load_flickr30k,
                captioning.FLICKR_LAYOUT, postprocess="caption"),
    _image_task("vqav2", "vqa", "vqa_accuracy", 5, "vqav2", vqa.load_vqav2, vqa.VQAV2_LAYOUT,
                postprocess="vqa"),
    _image_task("okvqa", "vqa", "vqa_accuracy", 5, "okvqa", vqa.load_okvqa, vqa.OKVQA_LAYOUT,
                postprocess="ok_vqa"),
    _image_task("textvqa", "vqa", "vqa_accuracy", 10, "textvqa", vqa.load_textvqa,
                vqa.TEXTVQA_LAYOUT, postprocess="vqa"),
    _image_task("vizwiz", "vqa", "vqa_accuracy", 5, "vizwiz", vqa.load_vizwiz,
                vqa.VIZWIZ_LAYOUT, postprocess="vqa"),
    _image_task("hateful_memes", "classification", "roc_auc", 0, "hateful_memes",
                classification.load_hateful_memes, classification.HATEFUL_MEMES_LAYOUT),
    _image_task("imagenet", "classification", "top1", 0, "imagenet",
                classification.load_imagenet, classification.IMAGENET_LAYOUT),
)

# Video tasks (their own folders: DATA/msvd_qa/, DATA/msrvtt_qa/, DATA/vatex/) and the
# demo's synthetic episodes (no files: a synthetic workdir's config makes them).
from flamingo_jax.evaluation.tasks import synthetic, video  # noqa: E402

register(video.MSVD_QA, video.MSRVTT_QA, video.VATEX, synthetic.TASK)
