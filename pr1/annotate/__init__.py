"""Stage 1 of the paper (`python -m pr1.annotate`): distil chains of thought from a teacher VLM, keep
the ones the accuracy reward accepts, and extract the visual annotations the training parquet's
`visual_key_info` holds. `pipeline` runs it (`annotate(AnnotateOptions(...))`); `prompts` holds what
the models are told and the parsing of the extractor's reply; `source` reads the input rows;
`cache` makes a run resumable.

Nothing is imported here: the math-verify workers re-import the entry module (and so this package)
at start-up, and should not pay for the dataset code's imports.
"""
