"""revseg MONAI Label app: wiring only. Every task is built from lib/; conf keys are in lib/app_config.py.

    monailabel start_server --app apps/revseg --studies data/studies --conf models unet,swin_unetr
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # lib/ and model/ live at the repository root
    sys.path.insert(0, str(REPO_ROOT))

from monailabel.config import settings  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.datastore import DefaultLabelTag  # noqa: E402
from monailabel.interfaces.exception import ImageNotFoundException  # noqa: E402
from monailabel.tasks.activelearning.first import First  # noqa: E402
from monailabel.tasks.activelearning.random import Random  # noqa: E402

from lib.activelearning.monailabel_tasks import AttentionScoring, AttentionStrategy  # noqa: E402
from lib.app_config import AppConfig  # noqa: E402
from lib.classes import slicer_label_names  # noqa: E402
from lib.datastore import RevisionDatastore, check_identifier  # noqa: E402
from lib.infers.attention import AttentionInfer  # noqa: E402
from lib.infers.segmentation import UniversalSegmentation  # noqa: E402
from lib.model_store import ModelStore  # noqa: E402
from lib.server_auth import install_token_check  # noqa: E402
from lib.server_errors import install_error_handlers  # noqa: E402
from lib.trainers.train_task import RevisionTrainTask  # noqa: E402

log = logging.getLogger(__name__)


class RevsegApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        self.app_config = AppConfig.from_conf(conf)
        self.store = ModelStore(self.app_config.model_dir)
        self.attention_scoring = AttentionScoring(self.app_config.models, self.store, self.app_config)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="revseg", version="0.1.0",
                         description="Universal abdominal CT segmentation that learns from expert revisions",
                         labels=slicer_label_names())
        if "monailabel.app" in sys.modules:  # inside the server, not the training subprocess
            install_token_check()
            install_error_handlers(sys.modules["monailabel.app"].app,
                                   max_upload_bytes=int(self.app_config.max_upload_mb * 2**20))

    def init_datastore(self) -> RevisionDatastore:
        return RevisionDatastore(self.studies, max_upload_mb=self.app_config.max_upload_mb,
                                 extensions=("*.nii.gz", "*.nii", "*.nrrd"),
                                 auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD)

    def init_infers(self):
        models = self.app_config.models
        infers = {b: UniversalSegmentation(b, self.store, self.app_config) for b in models}
        return infers | {"attention": AttentionInfer(models, self.store, self.app_config)}

    def init_trainers(self):
        return {b: RevisionTrainTask(b, self.store, self.app_config) for b in self.app_config.models}

    def init_strategies(self):
        return {"attention": AttentionStrategy(), "random": Random(), "first": First()}

    def init_scoring_methods(self):
        return {"attention": self.attention_scoring}

    def infer(self, request, datastore=None):
        """Only datastore ids or this server's own upload temp files: never an arbitrary server path."""
        image = request.get("image")
        if isinstance(image, str):
            uploaded = os.path.isabs(image) and Path(image).resolve().parent == Path(tempfile.gettempdir()).resolve()
            if not uploaded:
                check_identifier(image)
                if image not in self.datastore().list_images():
                    raise ImageNotFoundException(f"image {image!r} is not in the datastore")
        return super().infer(request, datastore)

    def on_save_label(self, image_id: str, label_id: str):
        """Record which classes the expert revised, against the AI's prediction for the image."""
        store: RevisionDatastore = self.datastore()
        final = store.get_label_info(image_id, DefaultLabelTag.FINAL.value) if image_id in store.get_labeled_images(
            DefaultLabelTag.FINAL.value) else {}
        if not final or final.get("revision", {}).get("version") == final.get("version"):
            return {}
        backbone = next((b for b in self.app_config.models if self.store.exists(b)), None)
        predict = self._infers[backbone].predict_label_file if backbone else None
        record = store.record_revision(image_id, self.app_config.revision_min_voxels, predict)
        log.info("revision of %s: %s", image_id, record.get("revised_classes"))
        return {"revised_classes": record.get("revised_classes", [])}
