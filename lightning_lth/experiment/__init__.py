"""The study of Appendix A.5: stage keys, the stage store and the pipeline."""
