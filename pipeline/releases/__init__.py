"""Released latent-CoT checkpoints (CODI, SIM-CoT, Coconut) read into the project's merged model
directory: ``python -m pipeline.import_reference`` (pipeline/import_reference.py) is the command;
``files`` reads a release's weights, ``mapping`` accounts for each of its tensors, ``tokens``
lays out the tokenizer at the reference's ids, ``write`` writes the directory."""
