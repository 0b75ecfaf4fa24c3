"""Host-side data: image preprocessing, prompt tokenization, datasets."""
