"""Task data for tcopilot: generated arithmetic word problems, LLM-Adapters files, tokenizers, prompts,
scoring. Nothing here imports the kernels, so data can be prepared on any machine."""

from tcopilot.data.arithmetic import TEMPLATES, Template, arithmetic_splits, generate_arithmetic, save_json
from tcopilot.data.loader import (
    convert_mawps_item,
    count_overlap,
    drop_overlap,
    equation_to_expression,
    format_number,
    load_llm_adapters,
    normalize_question,
    question_of,
)
from tcopilot.data.prompts import (
    IGNORE_INDEX,
    PROMPT_STYLES,
    TaskDataset,
    collate,
    encode_example,
    encode_prompts,
    format_completion,
    format_prompt,
)
from tcopilot.data.scoring import (
    answer_format_choices,
    exact_match_accuracy,
    extract_answer,
    extract_choice,
    is_correct,
    is_correct_choice,
    parse_number,
)
from tcopilot.data.tokenizer import HFTokenizer, WordTokenizer

__all__ = [
    "TEMPLATES",
    "Template",
    "arithmetic_splits",
    "generate_arithmetic",
    "save_json",
    "convert_mawps_item",
    "count_overlap",
    "drop_overlap",
    "equation_to_expression",
    "format_number",
    "load_llm_adapters",
    "normalize_question",
    "question_of",
    "IGNORE_INDEX",
    "PROMPT_STYLES",
    "TaskDataset",
    "collate",
    "encode_example",
    "encode_prompts",
    "format_completion",
    "format_prompt",
    "answer_format_choices",
    "exact_match_accuracy",
    "extract_answer",
    "extract_choice",
    "is_correct",
    "is_correct_choice",
    "parse_number",
    "HFTokenizer",
    "WordTokenizer",
]
