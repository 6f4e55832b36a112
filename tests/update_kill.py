"""Run ``python -m updates`` with a SIGKILL at one point (tests only).

    python tests/update_kill.py train|export|publish -- <updates CLI args>

train: after the first training batch; export: when the retrieval model is
being built (the towers are staged); publish: after the first model's
version was renamed into place, before the others.
"""
import os
import signal
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    import tensorflow as tf

    if point == "train":
        import updates.update as update
        real_fit = update.fit

        class Kill(tf.keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                _die()

        update.fit = lambda *a, **kw: real_fit(*a, extra_callbacks=[Kill()], **kw)
    elif point == "export":
        import export.exporter as exporter
        real_build = exporter._build_model

        def build(name, *a, **kw):
            if name == "retrieval":
                _die()
            return real_build(name, *a, **kw)

        exporter._build_model = build
    elif point == "publish":
        from export.versioning import StagedVersion

        def publish(self):
            name, staging = next(iter(self._dirs.items()))
            os.rename(staging, self.target(name))
            _die()

        StagedVersion.publish = publish
    else:
        raise SystemExit(f"unknown kill point {point}")


if __name__ == "__main__":
    arm(sys.argv[1])
    from updates.cli import main
    sys.exit(main(sys.argv[3:]))
