"""`--mode upcycle`: a trained standard or GQA model (this harness's, or a Hugging Face Llama) turned into DBA."""
