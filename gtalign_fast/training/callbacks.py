"""``transformers.TrainerCallback``-style hooks for :class:`~gtalign_fast.GRPOTrainer`.

:class:`CallbackHandler` keeps a ``TrainerState`` and a ``TrainerControl`` (plain stand-ins when
transformers is missing) and calls each callback's ``on_<event>`` method with the trainer's
objects, as ``transformers.Trainer`` does; a callback may stop training through
``control.should_training_stop``.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["CallbackHandler"]


class CallbackHandler:
    """Calls ``transformers.TrainerCallback``-style hooks with a TrainerState and TrainerControl."""

    def __init__(self, callbacks: Sequence[Any], trainer: Any) -> None:
        self.callbacks, self.trainer = list(callbacks), trainer
        try:
            from transformers import TrainerControl, TrainerState

            self.state = TrainerState(max_steps=trainer.max_steps, logging_steps=trainer.args.logging_steps,
                                      save_steps=trainer.args.save_steps, is_world_process_zero=trainer.dist.is_main)
            self.control = TrainerControl()
        except ImportError:  # plain objects: the same attributes, nothing else
            self.state = _Plain(global_step=0, max_steps=trainer.max_steps, log_history=[], epoch=0.0)
            self.control = _Plain(should_training_stop=False)

    def __call__(self, event: str, **kwargs: Any) -> None:
        self.state.global_step = self.trainer.step
        for callback in self.callbacks:
            method = getattr(callback, event, None)
            if method is None:
                continue
            result = method(
                self.trainer.args, self.state, self.control, model=self.trainer.model,
                processing_class=self.trainer.processing_class, optimizer=self.trainer.optimizer,
                lr_scheduler=self.trainer.lr_scheduler, **kwargs,
            )
            if result is not None:
                self.control = result


class _Plain:
    def __init__(self, **attributes: Any) -> None:
        self.__dict__.update(attributes)
