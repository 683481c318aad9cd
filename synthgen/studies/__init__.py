"""Studies: experiments that combine generation, augmentation and training to answer a question
(does synthetic data help a classifier?), above the metrics they report."""
