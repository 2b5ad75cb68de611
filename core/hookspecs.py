"""The hook contract between the engine and every mechanism, in the order a run calls them.

A mechanism is a class whose methods carry ``@hookimpl`` (``from tuneforge.sdk import hookimpl``: a plugin imports
tuneforge only through :mod:`tuneforge.sdk`) and are named after the hooks below. It
implements only the hooks it needs, and each implementation takes only the arguments it uses (pluggy passes
arguments by name, so hooks can grow new arguments without breaking old plugins).

Lifecycle of one run::

    modify_model -> trainable_params -> validate -> load (resume only) -> run_start
        -> per epoch: data (online objectives: reward) -> per micro-batch: loss -> per optimizer step: step_end
                                              -> every eval_every steps: evaluate
                                              -> every save_every steps: save
    -> run_end

Under torchrun every hook runs in every process (``tuneforge_save`` in rank 0's only), and the hooks that get the
model outside its loss (``run_start``, ``evaluate``, ``save``, ``run_end``, and ``data`` for objectives that take
``model``) see it with whole weights, also under FSDP: parameters are found by structure there, never through
references kept from ``modify_model`` (FSDP replaces them). See docs/distributed.md.

Two of these hooks define the run's *objective* (``data`` and ``loss``): one plugin implements both, and a run
has at most one, checked when the run is set up. A plugin may mark its pair ``@hookimpl(trylast=True)`` to offer
a *default* objective, used only when no other plugin brings one (``run.objective`` names the winner). A run
that trains nothing (``prompting``) needs no objective. A plugin class with ``objective_yields = True`` (finetune)
brings a regular objective that gives way to another plugin's regular one. The other hooks may be implemented by
any number of plugins.
"""
from __future__ import annotations

import pluggy

__all__ = ["hookspec", "hookimpl", "PROJECT", "OBJECTIVE_HOOKS"]

PROJECT = "tuneforge"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: Hooks whose single implementation is the run's objective; two plugins answering one of them is an error.
OBJECTIVE_HOOKS = ("tuneforge_data", "tuneforge_loss")


@hookspec
def tuneforge_modify_model(model, run):
    """Change the model before training: insert modules, replace heads, add soft prompts.

    :param model: the ``torch.nn.Module`` being trained (pretrained weights already loaded when ``--init``
        was given).
    :param run: the :class:`tuneforge.Run` (options, tokenizer, output folder, step counters).
    :return: ``None`` when the model was changed in place, or a module that replaces it for the plugins after
        this one and for the rest of the run.

    Called once, for every active plugin in **registration order** (the order mechanisms were named), each
    seeing the model as the plugins before it left it. Must be deterministic: on ``--resume`` it runs again
    and the saved weights are loaded into the result.
    """


@hookspec
def tuneforge_trainable_params(model, run):
    """Name the parameters this plugin wants trained.

    :param model: the model after every ``tuneforge_modify_model``.
    :param run: the run.
    :return: an iterable of ``torch.nn.Parameter`` (find them by structure: the modules this plugin inserted,
        not by matching names), an empty iterable to train nothing, or ``None`` to have no opinion.

    All results are collected; the engine trains their union and freezes every other parameter. A run in which
    no plugin answers is an error (nothing would say what to train).
    """


@hookspec
def tuneforge_validate(run, model):
    """Check the assembled run and refuse a combination this plugin cannot work in.

    :param run: the run; ``run.trainable`` maps every plugin to the number of parameters it asked to train, and
        ``run.objective`` names the objective plugin (``None`` when there is none).
    :param model: the model after every ``tuneforge_modify_model``, parameters already frozen or not.
    :return: ignored. Raise :class:`tuneforge.sdk.ConfigError` saying what clashes and what to do instead.

    Called once, after ``tuneforge_trainable_params`` and before any data is read or any file written, so a
    refused run leaves nothing behind (``prompting`` refuses any plugin that would train).
    """


@hookspec
def tuneforge_load(run, path):
    """Restore this plugin's state from a checkpoint folder when a run resumes (``--resume``).

    :param run: the run.
    :param path: ``pathlib.Path`` of the checkpoint folder, as written by :func:`tuneforge_save`.
    :return: ignored.

    Called for every plugin, after the model, optimizer and engine state were restored and before
    ``tuneforge_run_start``.
    """


@hookspec
def tuneforge_run_start(run, model):
    """The run is set up and about to train: open files, start progress bars, remember initial weights.

    :param run: the run; ``run.step`` is 0, or the step a resumed run continues from.
    :param model: the model as it will be trained.
    :return: ignored.
    """


@hookspec(firstresult=True)
def tuneforge_data(run, model):
    """Provide the objective's training batches for one epoch.

    :param run: the run; ``run.epoch`` is the epoch to produce and ``run.seed`` its seed. The batches must be a
        deterministic function of those two (and, for objectives that generate their data, of the model),
        so that a resumed run sees the same data in the same order.
    :param model: the model being trained, as it is when the epoch's batches are drawn. Objectives that make
        their data from the model itself use it: RLHF's rollouts sample responses from the policy, so a
        ``ppo`` epoch is one rollout batch. Iterables are consumed lazily, so a generator sees the weights of
        the step it is drawn at.
    :return: an iterable of micro-batches (any object ``tuneforge_loss`` understands, usually a dict of
        tensors on CPU; the engine moves tensors in dicts to ``run.device``), or ``None``.

    **firstresult**: only the objective's implementation is called (see the module docstring for defaults).
    Called before training starts for epoch 0 (so malformed data fails before anything is written) and again
    whenever an epoch is exhausted. Read and validate all records here, raising
    :class:`tuneforge.sdk.DataError` with ``file:line`` and the field on bad input.
    """


@hookspec
def tuneforge_reward(prompts, responses, run):
    """Score sampled responses: the reward of online objectives (``ppo``, ``grpo``, a plugin's own).

    :param prompts: the prompts answered, one per response: text, or a conversation (a list of
        ``{"role", "content"}`` messages ending with a user turn).
    :param responses: the responses, decoded text without their stop token.
    :param run: the run.
    :return: one finite number per response (a list of floats, or a (N,) tensor; higher is better), or ``None``
        to abstain.

    Called by an online objective each time it draws a rollout (inside ``tuneforge_data``), on the main process
    and every other alike, with the same arguments. Every plugin's answer is **summed** (a plugin weighs its own
    reward with an option of its own); the objective adds the reward named by its ``reward=`` option
    (:class:`tuneforge.sdk.Rewards`) and logs each source's mean as ``reward/<plugin>``. Programs that check a
    response (verifiers, unit tests, format checks) are rewards here, as is a trained reward model.
    """


@hookspec(firstresult=True)
def tuneforge_loss(model, batch, run):
    """Compute the objective on one micro-batch.

    :param model: the model being trained.
    :param batch: one item of the iterable returned by ``tuneforge_data``.
    :param run: the run.
    :return: ``(loss, metrics)``: a scalar tensor to minimise and a dict of ``str -> float`` to log (may be
        empty); a ``"tokens"`` entry, when given, feeds the throughput figure. Or ``None``.

    **firstresult**: only the objective's implementation is called. Mixed batches route rows to tasks with
    ``tuneforge.sdk.routing.rows`` around the forward. The engine divides the loss by the number of accumulation
    steps and calls ``backward``; a non-finite loss makes it skip the step.
    """


@hookspec
def tuneforge_step_end(run, step, metrics):
    """An optimizer step finished (or was skipped because the loss was not finite).

    :param run: the run.
    :param step: the number of the step just finished, from 1.
    :param metrics: dict of ``str -> float``: ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``skipped``,
        the objective's own metrics, and ``eval/...`` entries on steps that evaluated.
    :return: ignored. Loggers, progress bars and early-stopping plugins live here.
    """


@hookspec
def tuneforge_evaluate(model, run):
    """Evaluate the model on held-out data: every ``--eval-every`` steps, and once when the run ends.

    The final evaluation comes after the run's last checkpoint is written, with ``run.stop_reason`` saying why the
    run ends (None during training; then ``"steps"``, ``"signal"`` or ``"early-stop"``, see ``Run``). On
    ``"signal"`` (Ctrl-C, a scheduler's SIGTERM) the process is inside a grace period: skip what is slow, such as
    sampling responses, and return what is cheap or ``None``.

    :param model: the model, in eval mode and under ``torch.no_grad()``.
    :param run: the run.
    :return: a dict of ``str -> float`` or ``None``. Every plugin's dict is merged (keys are prefixed with
        ``eval/`` in the step metrics), so objectives and extra evaluators can coexist.
    """


@hookspec
def tuneforge_save(run, path, model):
    """Write this plugin's own state into a checkpoint folder being built.

    :param run: the run.
    :param model: the model being saved (its weights go to ``model.safetensors`` beside, whatever a plugin does).
    :param path: ``pathlib.Path`` of a *temporary* folder; the engine renames it into place once every plugin
        has written, so a crash here never leaves a half-written checkpoint. Write safetensors and JSON files,
        never pickle, named after the plugin to avoid collisions.
    :return: ignored.
    """


@hookspec
def tuneforge_run_end(run, model, summary):
    """The run finished (all steps, stopped early, or interrupted and checkpointed).

    :param run: the run.
    :param model: the trained model.
    :param summary: the dict the engine writes to ``summary.json``; plugins may add entries to it.
    :return: ignored. Close files and progress bars here.
    """
