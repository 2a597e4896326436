"""Demo, test and benchmark support, kept apart from the library's core.

    run.py           `nnunet_rndpo demo`: the whole story on an embedded synthetic dataset
    synthetic.py     the synthetic 3D dataset (two classes, blurred boundaries) in nnU-Net raw layout
    splits.py        one splitter of a raw dataset into labeled / unlabeled pool / validation / test parts
    nnunet_steps.py  thin wrappers around nnU-Net's plan, train, predict and evaluate steps

Nothing in nnunet_rndpo's core imports this package.
"""
