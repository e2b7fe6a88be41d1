"""Model wrappers: NNsight for any nn.Module, LanguageModel for Hugging Face."""
