"""The plugin SDK: everything a mechanism may import from tuneforge, in one place.

A mechanism (built-in, an example, one made by ``tuneforge new-plugin``, or a third party's pip package) imports
from ``tuneforge.sdk`` only, and its tests from ``tuneforge.sdk.testing``. What is named here is kept working
across releases; every other module of tuneforge is internal and may move (a test checks that the built-in
plugins, the example and the scaffold's template import nothing else). The hook contract itself is
:mod:`tuneforge.hookspecs`; ``docs/writing-mechanisms.md`` is the guide and ``docs/architecture.md`` the map.

The names, by what a mechanism does with them:

- **hooks and errors**: :data:`hookimpl`, the exceptions (:class:`ConfigError` for bad options, ...).
- **options**: :func:`check_range`, :func:`suggest`, :class:`OptionError`; safe names and files:
  :func:`check_name`, :func:`inside`, :func:`replace_folder`, :func:`write_export`, :func:`open_text`.
- **the model**: :class:`LanguageModel` (the interface), :class:`Prefix` (soft prompts), :class:`KVPrefix` and
  :func:`token_keys_values` (extra keys and values for attention: prefix tuning), :func:`tokenizer_of`, the architecture
  families (:func:`family_of`, :func:`expand_targets`), :mod:`routing` (which task each row is) and :mod:`kernels`
  (the fused ops); :func:`load_model` rebuilds a trained model from a run or checkpoint folder.
- **data**: records, labelled data, rankings, chat records and the model's chat template, and batching (:func:`pad_right`, :func:`fit_context`,
  :func:`epoch_generator`).
- **objectives to delegate to**: :class:`TextTask` (next tokens), :class:`VerbalizedTask` / :class:`HeadTask`
  (classification), :class:`DefaultObjective` (what a parameterisation learns when no objective is named).
- **per-task parts**: :class:`PartMechanism` (the base of ``lora``, ``adapter`` and ``prompt-tuning``),
  :class:`TaskModule`, layer selection and part files.
- **steering a policy**: the frozen :class:`Reference`, log-probs, the preference models and the DPO loss,
  reward scoring, sampling rollouts, GAE; for online objectives :class:`OnlineObjective` (the pattern: one
  rollout per epoch, kept in checkpoints), :class:`RolloutBuffer`, :class:`Rewards` (``reward=`` and the
  ``tuneforge_reward`` plugins) and the world's fluency measure (:func:`in_vocabulary`).
"""
from tuneforge import kernels
from tuneforge.common.names import check_name, inside, is_name, replace_folder, write_export
from tuneforge.common.options import OptionError, check_range, suggest
from tuneforge.data.chat import TRAIN_ON, ChatExample, ChatTemplate, chat_messages, is_chat_record, template_of
from tuneforge.data.batching import epoch_generator, fit_context, pad_right
from tuneforge.data.labelled import Labelled, Template, has_labels, read_labelled
from tuneforge.data.rankings import (Ranking, prompt_ids, ranking_batch, ranking_epoch, ranking_ids, ranking_pairs,
                                     ranking_text, read_rankings, split_rankings)
from tuneforge.data.world import fluency_of, in_vocabulary
from tuneforge.data.records import Records, held_out_source, holdout_cut, read_records, split_held_out
from tuneforge.engine.checkpoint import MODEL_FILE, STATE_FILE, resolve_checkpoint
from tuneforge.engine.loop import load_model
from tuneforge.engine.registry import plugin_hooks
from tuneforge.engine.runfolder import open_text
from tuneforge.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError, PluginError, TuneforgeError
from tuneforge.hookspecs import hookimpl
from tuneforge.models import routing
from tuneforge.models.families import FAMILIES, Family, expand_targets, family_of
from tuneforge.models.lm_loss import hidden_logprobs, next_token_loss_of, target_logprobs, token_losses
from tuneforge.models.packing import packed_positions
from tuneforge.models.kv_slot import token_keys_values
from tuneforge.models.protocol import KVPrefix, LanguageModel, Prefix
from tuneforge.models.tokenizer import tokenizer_of
from tuneforge.objectives.classify import HeadTask, VerbalizedTask, score_candidates
from tuneforge.objectives.default import DefaultObjective, ObjectiveOptions
from tuneforge.objectives.next_token import TextTask, next_token_loss
from tuneforge.parts.files import NUMBER, WHOLE, is_part, one_of, read_part, save_part
from tuneforge.parts.mechanism import PartMechanism, PartOptions, part_generator
from tuneforge.parts.modules import (TaskModule, base_fingerprint, layer_of, match_linears, parse_layers, set_active,
                                     task_modules, using)
from tuneforge.rlhf.buffer import RolloutBuffer
from tuneforge.rlhf.online import OnlineObjective, OnlineOptions
from tuneforge.rlhf.policy import (Reference, block_parameters, check_layers, others_choose_params, policy_parameters,
                                   prepare_policy, resolve_layers,
                                   model_logprobs, response_logprobs, response_mask, sequence_logprobs, token_logprobs,
                                   untie_head)
from tuneforge.rlhf.preference import TIE_MODELS, dpo_loss, outcome_logprobs, pair_nll, pair_right
from tuneforge.rlhf.reward import REWARD_POOLS, ScalarHead, rewards, score
from tuneforge.rlhf.reward_sources import Rewards, reward_function
from tuneforge.rlhf.rollout import Samples, compare, continue_ids, gae, judge_for, masked_mean, sample, whiten

__all__ = [
    # hooks and errors
    "hookimpl", "TuneforgeError", "ConfigError", "DataError", "CheckpointError", "PluginError", "NonFiniteLossError",
    # options, names, files
    "check_range", "suggest", "OptionError", "check_name", "is_name", "inside", "replace_folder", "write_export",
    "open_text", "resolve_checkpoint", "MODEL_FILE", "STATE_FILE", "plugin_hooks",
    # the model
    "LanguageModel", "Prefix", "tokenizer_of", "Family", "FAMILIES", "family_of", "expand_targets", "routing",
    "kernels", "load_model", "token_losses", "next_token_loss_of", "hidden_logprobs", "target_logprobs",
    "packed_positions", "KVPrefix", "token_keys_values",
    # data
    "Records", "read_records", "split_held_out", "held_out_source", "holdout_cut", "Labelled", "Template",
    "read_labelled", "has_labels",
    "chat_messages", "is_chat_record", "template_of", "ChatTemplate", "ChatExample", "TRAIN_ON",
    "Ranking", "read_rankings", "split_rankings", "ranking_pairs", "ranking_text", "prompt_ids", "ranking_ids",
    "ranking_batch", "ranking_epoch", "pad_right", "fit_context", "epoch_generator",
    # objectives
    "TextTask", "next_token_loss", "VerbalizedTask", "HeadTask", "score_candidates", "DefaultObjective",
    "ObjectiveOptions",
    # per-task parts
    "TaskModule", "task_modules", "using", "set_active", "base_fingerprint", "parse_layers", "layer_of", "match_linears", "PartMechanism",
    "PartOptions", "part_generator", "save_part", "read_part", "is_part", "WHOLE", "NUMBER", "one_of",
    # steering a policy
    "Reference", "check_layers", "resolve_layers", "others_choose_params", "block_parameters", "untie_head",
    "prepare_policy", "policy_parameters",
    "token_logprobs", "response_logprobs", "model_logprobs", "sequence_logprobs", "response_mask", "TIE_MODELS", "outcome_logprobs", "pair_nll",
    "pair_right", "dpo_loss", "REWARD_POOLS", "ScalarHead", "rewards", "score", "Samples", "sample", "continue_ids",
    "compare", "judge_for",
    "masked_mean", "whiten", "gae", "RolloutBuffer", "OnlineObjective", "OnlineOptions", "Rewards", "reward_function",
    "in_vocabulary", "fluency_of",
]
