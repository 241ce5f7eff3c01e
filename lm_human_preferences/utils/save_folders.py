"""Every file and folder name of a run's save folder (`<save_root>/<NAME>`), in one place.

    train_reward_hparams.json     the hparams of a train_reward run as given, with the seed it used
    train_policy_hparams.json     … of a train_policy run (its reward model's nested inside)
    train_dpo_hparams.json        … of a train_dpo run (DPO: no reward model; its policy in policy/)
    reward_model/, policy/        the models: hparams.json, encoding, checkpoints/model-<step>.safetensors
    resume/reward_model/, resume/policy/   exact-resume state of each phase (training/resume.py)
    tb/reward_model/, tb/ppo/, tb/online/, tb/dpo/  TensorBoard event files
    train_reward_summary.json     the reward model's last training stats and held-out metrics
    train_dpo_summary.json        … a DPO run's (held-out: its implicit reward's accuracy)
    labels.json                   labels the run collected itself (mock labelers; online rounds)
    heldout_labels.json, online_summary.json, app/   online mode: held-out labels, the rounds,
                                  the labeling app's questions and answers
    samples.json                  the initial and the trained policy's responses to test queries
    mock_summary.json             the mock labeler's verdict on the trained policy
    report.html, report/          the run report and its plots
    .lock                         held while a run uses the folder
"""

REWARD_HPARAMS = "train_reward_hparams.json"
POLICY_HPARAMS = "train_policy_hparams.json"
DPO_HPARAMS = "train_dpo_hparams.json"
REWARD_MODEL = "reward_model"  # the reward model's folder, and its phase's names under resume/ and tb/
POLICY = "policy"  # the policy's folder, and its phase's name under resume/
CHECKPOINTS = "checkpoints"  # in a model's folder: model-<step>.safetensors, and `latest` naming the newest
RESUME = "resume"
TENSORBOARD = "tb"
PPO_LOG = "ppo"  # tb/ppo
ONLINE_LOG = "online"  # tb/online
DPO_LOG = "dpo"  # tb/dpo
REWARD_SUMMARY = "train_reward_summary.json"
DPO_SUMMARY = "train_dpo_summary.json"
LABELS = "labels.json"
HELDOUT_LABELS = "heldout_labels.json"
ONLINE_SUMMARY = "online_summary.json"
APP = "app"
SAMPLES = "samples.json"
MOCK_SUMMARY = "mock_summary.json"
REPORT = "report.html"
REPORT_PLOTS = "report"
LOCK = ".lock"
